"""``repguard serve``: an OpenAI-compatible server with the guard, and a router to mount elsewhere.

Needs the ``serve`` extra (``pip install 'repguard[serve,hf]'``). Import submodules directly:
``repguard.serve.app.create_app``, ``repguard.serve.router.build_router``.
"""
