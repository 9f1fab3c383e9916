//! The PITR planner (being written).
