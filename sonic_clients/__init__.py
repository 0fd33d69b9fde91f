"""Clients behind the SONIC producers: Triton gRPC, in-process inference, server registry."""
