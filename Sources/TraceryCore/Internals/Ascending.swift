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
}
