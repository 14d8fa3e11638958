"""A Flower `Grid` that delivers messages to real ClientApps in this process.

Not a mock: every message goes through the real `ClientApp` object (its handlers, routing and
records), with a `Context` per node that persists across messages like a SuperNode's. It lets
tests drive the real ServerApp logic in seconds, record every reply that would cross the
network, and interrupt a run at a chosen point.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1


class InProcessGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        node_configs: list[dict],
        run_config: dict,
        *,
        before_send: Callable[[Message], None] | None = None,
    ):
        self.app = app
        self.run_config = run_config
        self.contexts = {
            1000 + i: Context(RUN_ID, 1000 + i, dict(config), RecordDict(), dict(run_config))
            for i, config in enumerate(node_configs)
        }
        self.before_send = before_send
        # The ServerApp creates messages with the Message constructor, which reads the identity of
        # the running task; a real SuperLink sets it, here we do.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0
        self.replies: list[Message] = []  # everything the nodes sent back, in order
        self._ids = itertools.count()

    # Grid's bookkeeping --------------------------------------------------------------------
    def set_run(self, run) -> None:  # the run is fixed for an in-process grid
        pass

    @property
    def run(self):
        raise NotImplementedError("an in-process grid has no SuperLink run record")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        metadata = Metadata(
            run_id=RUN_ID, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
            reply_to_message_id="", group_id=group_id, created_at=time.time(), ttl=ttl or 3600.0,
            message_type=message_type,
        )
        return Message(content=content, metadata=metadata)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    # delivery ------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns
            if self.before_send is not None:
                self.before_send(message)
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.app(message, context)
            except Exception as error:  # what a SuperNode does with a failing ClientApp
                reply = Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            self.replies.append(reply)
            replies.append(reply)
        return replies
