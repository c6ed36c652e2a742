#!/usr/bin/env bash
# Table 4 of the SAM paper: CIFAR-10 with 20/40/60/80 % symmetric label noise, ResNet-32,
# 200 epochs, {SAM, SGD}; clean test accuracy at the end of training.
source "$(dirname "$0")/_sweep.sh"
for noise in 20 40 60 80; do
  run experiment=t4_cifar10_resnet32_noise${noise} optim=sam,sgd seed=$SEEDS "$@"
done
