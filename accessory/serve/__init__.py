"""An OpenAI-compatible HTTP server over ``MetaModel``: ``accessory serve`` / ``python -m accessory.serve``.

In a program::

    from accessory.serve import OpenAIService, start_in_thread
    server, _ = start_in_thread(OpenAIService(model, "my-model", "default"), port=0)
    print(server.url)        # http://127.0.0.1:PORT, then POST /v1/chat/completions ...

``api.py`` holds the API (request checks, prompts, response bodies), ``server.py`` the standard
library web server in front of it, ``cli.py`` the command line.
"""

from .api import ApiError, OpenAIService, messages_to_conversation
from .server import OpenAIServer, start_in_thread

__all__ = ["ApiError", "OpenAIService", "OpenAIServer", "messages_to_conversation", "start_in_thread"]
