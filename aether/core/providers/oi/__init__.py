"""The agentic path: Open Interpreter, one instance per conversation, whose code runs once the
user approves it, in a bubblewrap sandbox.

- ``provider``: the path itself (a turn in a worker thread, its chunks back through a channel);
- ``interpreters``: the instances, one per (caller, conversation), created, kept and closed;
- ``approval``: where a turn waits for the user's answer to a code confirmation;
- ``kernel``: interrupting the Python kernel on a stop, and settling it before the next turn;
- ``sandbox`` and ``kernel_sandbox``: the bubblewrap command line and its seam into Open
  Interpreter's kernel and shell;
- ``web_search``: the ``web_search()`` function given to the interpreter when configured.

@.architecture
role: agentic path package
jobs: [package_metadata]
"""
