"""What training and evaluation share: the data, the mesh, checkpoints, the
train state, the stage table and sample generation. Imports the method
(`multistep_cm.schedules` ... `samplers`, `models`), never evaluation or the
train loop."""
