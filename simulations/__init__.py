"""Running a federation on one machine: synthetic phantoms and the demo runner."""
