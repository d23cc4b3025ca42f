"""HTTP: app composition, the V2 REST routes and codec, the admin routes. The only layer that knows FastAPI."""
