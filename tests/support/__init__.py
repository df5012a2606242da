"""Test helpers shared by unit and integration tests: real upstreams and pytest fixtures."""
