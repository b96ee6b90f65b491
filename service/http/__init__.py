"""The HTTP layer: routes, the app, the server, request and response bodies, error replies."""
