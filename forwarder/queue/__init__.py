"""The durable queue: SQLite in WAL mode, in its own file. Every commit that adds a message is
fsync'd (synchronous=FULL) before the 250; an outcome or a lease alone is not (writer.py).

| module | holds |
|---|---|
| `model.py` | what goes in and comes out: `NewMessage`, `Job`, `Result`, `QueueError` |
| `schema.py` | the schema, its migrations (forwarder/migrations.py), `open_queue_db` |
| `writer.py` | the writer thread, group commit, waiting for another process's lock |
| `ops.py` | the SQL: insert, record, lease, recover, crash blame applied |
| `facade.py` | `Queue`, the daemon's handle on all of the above |
| `intake.py` | the front's one door: `Intake.accept(message)` |
| `spool.py` | bodies too big for a row: spool files, written as they arrive |

The names below are the package's public face; import them from `forwarder.queue`.
"""

from forwarder.queue.facade import Queue
from forwarder.queue.intake import DirectIntake, Intake, ScannerIntake
from forwarder.queue.model import (
    PLAIN,
    Body,
    Job,
    MessageFlags,
    NewMessage,
    NewRecipient,
    QueueError,
    RecipientJob,
    Result,
    SpooledBody,
    body_size,
    new_queue_id,
)
from forwarder.queue.schema import QUEUE_SCHEMA_VERSION, open_queue_db

__all__ = [
    "PLAIN",
    "QUEUE_SCHEMA_VERSION",
    "Body",
    "DirectIntake",
    "Intake",
    "Job",
    "MessageFlags",
    "NewMessage",
    "NewRecipient",
    "Queue",
    "QueueError",
    "RecipientJob",
    "Result",
    "ScannerIntake",
    "SpooledBody",
    "body_size",
    "new_queue_id",
    "open_queue_db",
]
