//! grid sim
