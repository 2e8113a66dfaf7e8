"""The delivery history per address: what became of each message to a graduate, and who
was refused at RCPT, kept by the daemon for `forwarder history` and `forwarder send-test`.

| module | holds |
|---|---|
| `headers.py` | the header facts kept (From: domain, Message-ID, Subject if configured) |
| `store.py` | the SQL: rows written in the queue's transactions, purges, the CLI's reads |
| `recorder.py` | the daemon's side: what is written when, and the retention |
| `view.py` | the lines a help desk reads aloud, and the JSON |

It lives in the queue's SQLite file, local to the node that handled the message: with
several nodes, each keeps the history of the mail it received (docs/admin.md says how to
ask both). `store.open_reader` and the two `read_*` functions are the whole interface the
CLI uses, so another backend needs only those.
"""
