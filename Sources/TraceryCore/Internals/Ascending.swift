extension RandomAccessCollection where Index == Int {
  /// Whether `key` ascends along the collection (`strictly`: no two equal). Batches of sites
  /// usually come in address order; checking is one pass, sorting (and copying) is not.
  func isAscending(strictly: Bool, by key: (Element) -> UInt64) -> Bool {
    indices.dropFirst().allSatisfy { index in
      strictly ? key(self[index - 1]) < key(self[index]) : key(self[index - 1]) <= key(self[index])
    }
  }

  /// The first index whose `key` is not below `value`, in a collection sorted by `key` (its count
  /// when there is none): a binary search.
  func firstIndex(notBelow value: UInt64, by key: (Element) -> UInt64) -> Int {
    var lower = 0
    var upper = count
    while lower < upper {
      let middle = (lower + upper) / 2
      if key(self[middle]) < value { lower = middle + 1 } else { upper = middle }
    }
    return lower
  }

  /// `firstIndex(notBelow:by:)` searched forward from `hint` (galloping: 1, 2, 4, … elements on,
  /// then a binary search in the last step) when `hint` is at or before the answer; else a
  /// binary search of the whole. For ascending queries (functions in address order) the answer
  /// is a few elements on from the last one.
  func firstIndex(notBelow value: UInt64, by key: (Element) -> UInt64, from hint: Int) -> Int {
    guard hint > 0, hint <= count, key(self[hint - 1]) < value else {
      return hint == 0 ? galloping(notBelow: value, by: key, from: 0) : firstIndex(notBelow: value, by: key)
    }
    return galloping(notBelow: value, by: key, from: hint)
  }

  /// Precondition: every element before `start` is below `value`.
  private func galloping(notBelow value: UInt64, by key: (Element) -> UInt64, from start: Int) -> Int {
    var lower = start
    var step = 1
    while lower + step - 1 < count, key(self[lower + step - 1]) < value {
      lower += step
      step *= 2
    }
    var upper = Swift.min(count, lower + step - 1)
    while lower < upper {
      let middle = (lower + upper) / 2
      if key(self[middle]) < value { lower = middle + 1 } else { upper = middle }
    }
    return lower
  }
}
