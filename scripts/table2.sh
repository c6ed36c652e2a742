#!/usr/bin/env bash
# Table 2 of the SAM paper: ImageNet, ResNet-50/101/152 for 100/200/400 epochs, {SAM, SGD}.
# Needs ImageNet in the image-folder layout (docs/imagenet.md) and, realistically, several GPUs
# (engine.ddp=true) or a cluster (hydra/launcher=slurm).
source "$(dirname "$0")/_sweep.sh"
for model in resnet50 resnet101 resnet152; do
  for epochs in 100 200 400; do
    run experiment=t2_imagenet_${model}_${epochs}ep optim=sam,sgd seed=$SEEDS "$@"
  done
done
