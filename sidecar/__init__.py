"""A messaging sidecar: Botpress Messaging API compatible ingress, durable bot replies."""
