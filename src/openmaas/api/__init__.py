"""Protocol surfaces: parse and validate, call the gateway, format. No business logic."""
