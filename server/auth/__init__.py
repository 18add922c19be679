"""Caller identity (mutual TLS or bearer tokens), scopes per caller, and the interceptor that checks both before
any request is decoded."""
