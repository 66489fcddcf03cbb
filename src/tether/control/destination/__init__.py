"""The destination service: endpoints, profiles and policies served from the store as gRPC streams."""
