//! grid node
