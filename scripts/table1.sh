#!/usr/bin/env bash
# Table 1 of the SAM paper: CIFAR-10/100 from scratch; every model setting x augmentation x
# {SAM, SGD}, 5 seeds. SGD_2X=1 also runs SGD at twice the epochs (the paper allowed its baseline
# 2x epochs and reported the better of the two; the report takes the better one too).
source "$(dirname "$0")/_sweep.sh"
declare -A EPOCHS=([wrn28_10_200ep]=200 [wrn28_10_1800ep]=1800 [shakeshake]=1800 [pyramidnet]=1800 [pyramidnet_shakedrop]=1800)
for dataset in cifar10 cifar100; do
  for setting in wrn28_10_200ep wrn28_10_1800ep shakeshake pyramidnet pyramidnet_shakedrop; do
    for augment in basic cutout autoaugment; do
      run experiment=t1_${dataset}_${setting} augment=$augment optim=sam,sgd seed=$SEEDS "$@"
      if [[ "${SGD_2X:-0}" == 1 ]]; then
        run experiment=t1_${dataset}_${setting} augment=$augment optim=sgd epochs=$((2 * EPOCHS[$setting])) seed=$SEEDS "$@"
      fi
    done
  done
done
