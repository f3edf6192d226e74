"""kopf handlers: parse, build, apply, set status. Registered by `register` with the operator's settings."""
