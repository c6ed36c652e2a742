#!/usr/bin/env bash
# Table 5 of the SAM paper: SVHN and Fashion-MNIST, WRN-28-10 and Shake-Shake, {SAM, SGD}.
# The "autoaugment" column is the SVHN policy + Cutout for SVHN and Cutout only for Fashion-MNIST.
source "$(dirname "$0")/_sweep.sh"
declare -A STRONG=([svhn]=autoaugment_svhn [fashion_mnist]=cutout)
for dataset in svhn fashion_mnist; do
  for model in wrn28_10 shakeshake; do
    for augment in basic "${STRONG[$dataset]}"; do
      run experiment=t5_${dataset}_${model} augment=$augment optim=sam,sgd seed=$SEEDS "$@"
    done
  done
done
