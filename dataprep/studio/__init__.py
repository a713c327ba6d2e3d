"""Multi-view studio captures: `capture` (the on-disk capture format, reading and writing),
`geometry` (SPEC §4 cameras: validation, projection, Plücker rays, undistortion), `anchors`
(spatial anchors drawn from the head pose), `synth` (synthetic captures for tests and benches)."""
