"""Memory arithmetic and the planner that configures a run from its GPU-memory budget."""
