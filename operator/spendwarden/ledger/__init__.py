"""Pure accounting: periods, reservations, leases, forecasts. No I/O."""
