from lowrank.core.ranks import break_even_rank, factor_params, uniform_rank


def test_uniform_rank_formula():
    # r = floor(R m n / (m + n))
    assert uniform_rank(576, 576, 0.5) == 144
    assert uniform_rank(1536, 576, 0.5) == 209  # 0.5 * 884736 / 2112 = 209.45
    assert uniform_rank(192, 576, 0.8) == 115  # 0.8 * 110592 / 768 = 115.2


def test_ratio_is_read_exactly():
    # 0.3 * 100 * 100 / 200 is exactly 15; binary rounding of 0.3 must not make it 14.
    assert uniform_rank(100, 100, 0.3) == 15
    assert uniform_rank(100, 100, 0.7) == 35


def test_break_even_stays_dense():
    assert break_even_rank(576, 576) == 288
    assert uniform_rank(576, 576, 1.0) is None  # r reaches break-even: dense
    assert uniform_rank(576, 576, 0.999) == 287  # one below break-even: factorized
    assert uniform_rank(4, 4, 1.0) is None


def test_rank_is_at_least_one():
    assert uniform_rank(64, 64, 0.001) == 1


def test_factor_params():
    assert factor_params(10, 20, 3) == 90
    assert factor_params(10, 20, None) == 200
