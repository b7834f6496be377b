#![deny(unsafe_op_in_unsafe_fn)]
use ucx_rs as _;
