#!/usr/bin/env bash
# Table 3 of the SAM paper: finetuning EfficientNet-B7 and -L2 (timm checkpoints), {SAM, SGD}.
# Needs the pretrained weights (model.pretrained=true with network, or model.checkpoint=PATH)
# and the datasets (docs/finetune.md).
source "$(dirname "$0")/_sweep.sh"
for dataset in fgvc_aircraft flowers102 oxford_pets stanford_cars cifar10 cifar100 birdsnap food101 imagenet; do
  for model in b7 l2; do
    run experiment=t3_${dataset}_efficientnet_${model} optim=sam,sgd seed=$SEEDS "$@"
  done
done
