"""multistep_cm: Multistep Consistency Models in JAX/Flax."""

import setuptools

setuptools.setup(
    name='multistep_cm',
    version='0.1.0',
    description='Multistep Consistency Models (Heek, Hoogeboom, Salimans 2024) '
                'in JAX/Flax: diffusion teachers, distillation, samplers.',
    # configs/ holds experiments, read from the checkout; not installed.
    packages=setuptools.find_packages(include=['multistep_cm', 'multistep_cm.*']),
    package_data={'multistep_cm.evaluation': ['assets/*.npz']},
    license='Apache-2.0',
    python_requires='>=3.11',
    # Lower bounds: the oldest versions tested (constraints-oldest.txt says
    # with which tests); constraints.txt holds the newest tested set.
    install_requires=[
        # jax and numpy are bounded above too, to the releases tested: the
        # suite runs on Python 3.11 only, where these are the newest, and
        # Python 3.12 and 3.13 would otherwise resolve newer ones no test
        # has run (jax 0.12.1, numpy 2.5.5). jax's minor releases change
        # internals (liveness.py reads one) and exported programs' versions;
        # jax bounds jaxlib itself. With it, flax, optax and orbax resolve
        # to their tested versions on 3.12 and 3.13 too.
        'jax>=0.10.2,<0.11',
        # jax.export's (de)serialiser imports it, and jax does not install it.
        'flatbuffers>=25.12.19',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        # Reads prepared datasets without TensorFlow (array_record); building
        # one needs the `tfds` extra.
        'tensorflow-datasets>=4.9.10',
        'array-record>=0.8.3',  # Reads array_record files on gs:// too.
        'tensorboard>=2.21.0',  # Only to view the event files.
        'ml-collections>=1.0.0',
        'etils[epath]>=1.10.0',  # Files on local disks and gs:// alike.
        # epath's gs:// backend without TensorFlow: fsspec's GCS file system
        # (epath has no other; tensorstore, orbax's array store, has its
        # own GCS client).
        'gcsfs>=2026.10.1',
        'numpy>=2.0.2,<2.5',
        'scipy>=1.14.1',
        'scikit-learn>=1.5.2',  # Ships the 8x8 digits.
        'matplotlib>=3.9.4',
        'pillow>=10.4.0',
    ],
    extras_require={
        # TensorFlow, only for building tfds datasets (`tfds build`):
        # nothing imports it at run time, and it publishes no Linux aarch64
        # wheel for its CPU build.
        'tfds': ['tensorflow-cpu>=2.21.0'],
        # jax's detection of a Kubernetes job (GKE without TPUs, JobSet),
        # which asks the cluster's API for the process count and id.
        'k8s': ['jax[k8s]>=0.10.2,<0.11'],
        # Only for converting published weights (the FID Inception, CLIP,
        # ADM, DINOv2), once.
        'convert': ['torch>=2.13.0', 'safetensors>=0.8.0'],
        # torch writes the .pth the converter test reads; xdist runs the
        # suite on two processes (pytest.ini). pytest 9.2 made node ids
        # structured, and xdist 3.8's loadgroup, which marks a test's group
        # in its id, then silently stops grouping: tests sharing a trained
        # fixture would each train it.
        # diffusers for the ADM parity test; open_clip for the CLIP one,
        # with the torchvision built for torch 2.13.0 (unpinned, pip would
        # move torch to a CUDA build); timm's DINOv2 ViT for the DINOv2 one.
        'test': ['pytest>=9.1.1,<9.2', 'pytest-xdist>=3.8.0', 'torch>=2.13.0',
                 'open_clip_torch>=3.3.0', 'torchvision==0.28.0',
                 'safetensors>=0.8.0', 'diffusers>=0.42.1', 'timm>=1.0.31',
                 # A GCS server on loopback for the gs:// tests, exactly
                 # this release: tests/gcs.py patches its handlers.
                 'gcp-storage-emulator==2026.7.19',
                 # The tests build tfds datasets and compare with tf's ops.
                 'tensorflow-cpu>=2.21.0'],
    },
)
