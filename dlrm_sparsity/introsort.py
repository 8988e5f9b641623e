"""libstdc++'s std::sort (introsort) of float32 values in place, some of them followed.

The algorithm of torch's CPU sort of a float tensor, step for step, over values that are all
>= 0 (block averages of |x| or x*x). A followed value is written as -(j + 1), j its number,
and compared as table[j], its true value: it is moved as any other value is, and where it
ends is read off by its sign. Only the ranges that hold a followed value are sorted on: no
value ever leaves its range. The steps are cut so that the values may lie in a file's map
and only a window of them be resident: a range larger than the window is partitioned a
bounded number of steps at a time (partition_steps). Why, and how this is checked against
torch.sort: tie_order.py, which imports this module only when it needs it (numba weighs about
120 MiB).
"""

import numba
import numpy as np

THRESHOLD = 16  # libstdc++'s _S_threshold
_STACK = 160  # ranges waiting: at most the depth limit, 2 * floor(log2(n)) <= 126
_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True, inline="always")


@_inline
def _value(key, table):
    return key if key >= 0 else table[np.int64(-key) - 1]


@_inline
def _swap(keys, a, b):
    keys[a], keys[b] = keys[b], keys[a]


@_jit
def value_at(keys, table, i):
    return _value(keys[i], table)


@_jit
def _linear_insert(keys, table, last):  # __unguarded_linear_insert
    key = keys[last]
    value = _value(key, table)
    nxt = last - 1
    while value < _value(keys[nxt], table):
        keys[last] = keys[nxt]
        last = nxt
        nxt -= 1
    keys[last] = key


@_jit
def _insertion_sort(keys, table, first, last):  # __insertion_sort
    for i in range(first + 1, last):
        key = keys[i]
        if _value(key, table) < _value(keys[first], table):
            for j in range(i, first, -1):  # move_backward of [first, i)
                keys[j] = keys[j - 1]
            keys[first] = key
        else:
            _linear_insert(keys, table, i)


@_jit
def median_to_first(keys, table, first, last):  # __move_median_to_first
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    va, vb, vc = _value(keys[a], table), _value(keys[b], table), _value(keys[c], table)
    if va < vb:
        if vb < vc:
            _swap(keys, first, b)
        elif va < vc:
            _swap(keys, first, c)
        else:
            _swap(keys, first, a)
    elif va < vc:
        _swap(keys, first, a)
    elif vb < vc:
        _swap(keys, first, c)
    else:
        _swap(keys, first, b)


@_jit
def partition_steps(keys, table, lo, hi, scanning_hi, pivot, steps):
    """__unguarded_partition from lo, hi (lo = first + 1, hi = last to start) for about
    `steps` values: (lo, hi, scanning_hi, cut), cut -1 until the partition is done; call
    again with what it returns. The same comparisons and swaps as one call to the end."""
    while True:
        if not scanning_hi:
            while _value(keys[lo], table) < pivot:
                lo += 1
                steps -= 1
                if steps <= 0:
                    return lo, hi, False, -1
            hi -= 1
        while pivot < _value(keys[hi], table):
            hi -= 1
            steps -= 1
            if steps <= 0:
                return lo, hi, True, -1
        if not lo < hi:
            return lo, hi, False, lo
        _swap(keys, lo, hi)
        lo += 1
        steps -= 1
        scanning_hi = False
        if steps <= 0:
            return lo, hi, False, -1


@_jit
def count_followed(keys, first, last):
    found = 0
    for i in range(first, last):
        if keys[i] < 0:
            found += 1
    return found


@_jit
def sort_leaf(keys, table, first, last, places):
    """A range the introsort loop leaves (at most 16 values) as libstdc++'s final insertion
    sort leaves it, and where its followed values end: places[j] for -(j + 1).

    That sort runs once over the whole array, but every value of a range is at least every
    value of the ranges before it (each partition leaves the pivot's left part <= it <= the
    right part), so no value moves out of its range and each range comes out as an insertion
    sort of it alone."""
    _insertion_sort(keys, table, first, last)
    for i in range(first, last):
        if keys[i] < 0:
            places[np.int64(-keys[i]) - 1] = i


@_jit
def introsort_range(keys, table, first, last, depth, followed, places):
    """__introsort_loop over [first, last), which holds `followed` followed values, with
    `depth` levels left, and then the final insertion sort, where it changes a followed
    value's place: ranges without one are left as they are, since no value moves between
    ranges. False where a range would be heap-sorted (std::partial_sort, not followed here)."""
    ranges = np.empty((_STACK, 4), np.int64)
    ranges[0, 0], ranges[0, 1], ranges[0, 2], ranges[0, 3] = first, last, depth, followed
    waiting = 1
    while waiting:  # each range on its own: the order they are taken in changes nothing
        waiting -= 1
        first, last = ranges[waiting, 0], ranges[waiting, 1]
        depth, followed = ranges[waiting, 2], ranges[waiting, 3]
        while followed:
            if last - first <= THRESHOLD:
                sort_leaf(keys, table, first, last, places)
                break
            if depth == 0:
                return False
            depth -= 1
            median_to_first(keys, table, first, last)
            lo, hi, scanning_hi, cut = partition_steps(keys, table, first + 1, last, False,
                                                       _value(keys[first], table), last)
            left = count_followed(keys, first, cut)
            if followed > left:
                ranges[waiting, 0], ranges[waiting, 1] = cut, last
                ranges[waiting, 2], ranges[waiting, 3] = depth, followed - left
                waiting += 1
            last, followed = cut, left
    return True


@_jit
def tag(keys, wanted, table, indices, followed, offset):
    """Write each value of keys equal to one of wanted (ascending) as -(j + 1), its true
    value in table[j] and its index (from offset) in indices[j]: the count so far back, or
    -1 where table is full."""
    low, high = wanted[0], wanted[-1]
    for i in range(keys.size):
        key = keys[i]
        if low <= key <= high:
            for w in wanted:
                if key == w:
                    if followed == table.size:
                        return -1
                    table[followed], indices[followed] = key, offset + i
                    followed += 1
                    keys[i] = -np.float32(followed)
                    break
    return followed
