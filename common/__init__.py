"""What the hospital and the coordinator share. Never imports client, server, simulations or deploy."""
