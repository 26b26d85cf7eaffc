"""passes: arrives with the compiler issue (see DESIGN.md)."""
