"""The network face of mini-vllm: the WebSocket server, its JSON protocol, the bundled async
client, and the ``mini-vllm`` command line."""
