/// The process's mappings as `/proc/self/maps` lists them, sorted by address. A snapshot: other
/// threads may map and unmap after it is taken.
struct MemoryMap: Sendable {
  struct Region: Sendable, Equatable {
    let start: UInt64
    let end: UInt64
    let readable: Bool
    let writable: Bool
    let executable: Bool

    var protection: Int32 {
      (readable ? 1 : 0) | (writable ? 2 : 0) | (executable ? 4 : 0)
    }
  }

  let regions: [Region]

  static func current() -> MemoryMap {
    MemoryMap(parsing: System.readFile("/proc/self/maps") ?? [])
  }

  /// Parses the text of `/proc/PID/maps`: `start-end perms offset dev inode path` per line (only
  /// the range and permissions are kept). One
  /// pass over the bytes, no splitting: a batch reads the map every time, so this is on the
  /// patcher's path.
  init(parsing text: [UInt8]) {
    var regions: [Region] = []
    text.withUnsafeBufferPointer { bytes in
      var at = 0
      func hex() -> UInt64? {
        var value: UInt64 = 0
        var digits = 0
        while at < bytes.count {
          let byte = bytes[at]
          let digit: UInt8
          switch byte {
          case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
          case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
          default: return digits > 0 ? value : nil
          }
          value = value << 4 | UInt64(digit)
          digits += 1
          at += 1
        }
        return digits > 0 ? value : nil
      }
      while at < bytes.count {
        var lineEnd = at
        while lineEnd < bytes.count && bytes[lineEnd] != UInt8(ascii: "\n") { lineEnd += 1 }
        defer { at = lineEnd + 1 }
        guard let start = hex(), at < lineEnd, bytes[at] == UInt8(ascii: "-") else { continue }
        at += 1
        guard let end = hex(), at + 4 <= lineEnd, bytes[at] == UInt8(ascii: " ") else { continue }
        let perms = at + 1
        regions.append(
          Region(
            start: start, end: end, readable: bytes[perms] == UInt8(ascii: "r"),
            writable: bytes[perms + 1] == UInt8(ascii: "w"), executable: bytes[perms + 2] == UInt8(ascii: "x")))
      }
    }
    // The kernel lists mappings in address order.
    self.regions = regions
  }

  /// The region containing `address`.
  func region(containing address: UInt64) -> Region? {
    var low = 0
    var high = regions.count
    while low < high {
      let mid = (low + high) / 2
      if regions[mid].start <= address { low = mid + 1 } else { high = mid }
    }
    guard low > 0, address < regions[low - 1].end else { return nil }
    return regions[low - 1]
  }

  /// Whether `[address, address + count)` is mapped executable and readable throughout.
  func isExecutable(_ address: UInt64, count: UInt64) -> Bool {
    var at = address
    while at < address + count {
      guard let region = region(containing: at), region.executable, region.readable else { return false }
      at = region.end
    }
    return true
  }

  /// Unmapped gaps of at least `size` bytes, as page-aligned ranges.
  func gaps(atLeast size: UInt64, within bounds: Range<UInt64>) -> [Range<UInt64>] {
    var result: [Range<UInt64>] = []
    var cursor = bounds.lowerBound
    for region in regions {
      if region.start > cursor {
        let gap = cursor..<min(region.start, bounds.upperBound)
        if gap.upperBound > gap.lowerBound, gap.upperBound - gap.lowerBound >= size { result.append(gap) }
      }
      cursor = max(cursor, region.end)
      if cursor >= bounds.upperBound { break }
    }
    if cursor < bounds.upperBound, bounds.upperBound - cursor >= size { result.append(cursor..<bounds.upperBound) }
    return result
  }
}
