"""Front doors: HTTP (Messaging API format) and gRPC, both thin over the core."""
