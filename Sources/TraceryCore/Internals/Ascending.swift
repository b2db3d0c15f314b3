extension RandomAccessCollection where Index == Int {
  /// Whether `key` ascends along the collection (`strictly`: no two equal). Batches of sites
  /// usually come in address order; checking is one pass, sorting (and copying) is not.
  func isAscending(strictly: Bool, by key: (Element) -> UInt64) -> Bool {
    indices.dropFirst().allSatisfy { index in
      strictly ? key(self[index - 1]) < key(self[index]) : key(self[index - 1]) <= key(self[index])
    }
  }
}
