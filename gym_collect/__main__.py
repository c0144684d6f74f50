from gym_collect.entry import collect_rollouts

collect_rollouts()
