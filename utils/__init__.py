"""The bottom of the house: small helpers every package shares, importing no project package.

``utils.files`` atomic writes and the cache folder, ``utils.cli`` the user-error type and the command runner
(``error: ...``, exit 2), ``utils.schema`` the strict pydantic base and its one-line errors.
"""
