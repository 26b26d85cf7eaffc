"""codegen: arrives with the compiler issue (see DESIGN.md)."""
