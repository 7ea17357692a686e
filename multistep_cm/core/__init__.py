"""What training and evaluation share: the base config, the mesh,
checkpoints, the train state, the stage table and sample generation. Imports
the method (`multistep_cm.schedules` ... `samplers`, `models`) and the
dataset table (`multistep_cm.datasets`), never evaluation or the train
loop."""
