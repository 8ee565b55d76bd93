# syntax=docker/dockerfile:1
# The image of the training Job (deploy/k8s/jobs/train.yaml): the serving image (built
# from the repository's Dockerfile, which leaves out torch) plus the `train` extras of
# pyproject.toml (torch, onnx, onnxscript), read from the copy of pyproject.toml the
# serving image keeps in /app.
#
#   docker build -t recmesh:local .
#   docker build -t recmesh-train:local -f deploy/k8s/jobs/train.Dockerfile .
#
# torch's default Linux wheels bring CUDA libraries (several GB); a CPU-only torch build
# of the same version keeps the image far smaller.
FROM recmesh:local

USER root
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/app/pyproject.toml', 'rb'))['project']['optional-dependencies']['train']))" \
        > /tmp/train-requirements.txt \
    && pip install --no-cache-dir -r /tmp/train-requirements.txt \
    && rm /tmp/train-requirements.txt
USER 10001:10001
CMD ["recmesh", "train", "--no-progress"]
