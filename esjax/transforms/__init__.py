"""Scale-Up (`growth.grow`, `growth.grow_params`) and Scale-Out (`upcycle.upcycle`,
`upcycle.upcycle_params`) as pure functions on parameter pytrees; `build` runs one into a
(possibly sharded) model."""
