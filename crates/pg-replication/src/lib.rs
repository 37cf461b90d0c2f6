//! (placeholder: module documentation follows with the implementation)
