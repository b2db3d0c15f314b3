import Synchronization

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
  /// Readable and executable address ranges, adjacent regions merged: start and end words,
  /// alternating. `isExecutable` runs once per site of a batch, so it searches this short list.
  private let executable: [UInt64]

  static func current() -> MemoryMap {
    let map = MemoryMap(parsing: System.readFile("/proc/thread-self/maps") ?? [])
    latest.withLock { $0 = map }
    return map
  }

  /// The last map any caller read (or a new one): for uses that a stale map cannot harm, such as
  /// choosing where to try a `MAP_FIXED_NOREPLACE` mapping (a miss is retried with a fresh map).
  /// Each read costs ~30 µs in a small process: a traced process's start read three.
  static func recent() -> MemoryMap {
    latest.withLock { $0 } ?? current()
  }

  private static let latest = Mutex<MemoryMap?>(nil)

  /// Parses the text of `/proc/PID/maps`: `start-end perms offset dev inode path` per line (only
  /// the range and permissions are kept). One pass over the bytes with no closures or captured
  /// state: every batch reads the map, so this is on the patcher's path even in debug builds.
  init(parsing text: [UInt8]) {
    var regions: [Region] = []
    regions.reserveCapacity(256)
    text.withUnsafeBufferPointer { bytes in
      var at = 0
      let count = bytes.count
      while at < count {
        let start = Self.hex(bytes, &at)
        let dash = at
        at += 1
        let end = Self.hex(bytes, &at)
        let perms = at + 1
        if dash < count, bytes[dash] == 0x2d, perms + 3 <= count {  // '-'
          regions.append(
            Region(
              start: start, end: end, readable: bytes[perms] == 0x72, writable: bytes[perms + 1] == 0x77,
              executable: bytes[perms + 2] == 0x78))
        }
        while at < count && bytes[at] != 0x0a { at += 1 }  // to the end of the line
        at += 1
      }
    }
    // The kernel lists mappings in address order.
    self.regions = regions
    var executable: [UInt64] = []
    for region in regions where region.readable && region.executable {
      if let last = executable.last, last == region.start {
        executable[executable.count - 1] = region.end
      } else {
        executable += [region.start, region.end]
      }
    }
    self.executable = executable
  }

  /// Lower-case hex digits at `at`, advancing past them.
  private static func hex(_ bytes: UnsafeBufferPointer<UInt8>, _ at: inout Int) -> UInt64 {
    var value: UInt64 = 0
    while at < bytes.count {
      let byte = bytes[at]
      if byte >= 0x30 && byte <= 0x39 {
        value = value << 4 | UInt64(byte - 0x30)
      } else if byte >= 0x61 && byte <= 0x66 {
        value = value << 4 | UInt64(byte - 0x57)
      } else {
        break
      }
      at += 1
    }
    return value
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
    var hint = 0
    return isExecutable(address, count: count, hint: &hint)
  }

  /// `isExecutable` for many addresses in a row: `hint` (start at 0) remembers the range of the
  /// last answer, which sorted or clustered addresses hit again without a search.
  func isExecutable(_ address: UInt64, count: UInt64, hint: inout Int) -> Bool {
    guard address &+ count >= address else { return false }
    if hint > 0, hint < executable.count, executable[hint - 1] <= address {
      if address + count <= executable[hint] { return true }
    }
    var low = 0
    var high = executable.count / 2
    while low < high {
      let middle = (low + high) / 2
      if executable[2 * middle] <= address { low = middle + 1 } else { high = middle }
    }
    guard low > 0, address + count <= executable[2 * low - 1] else { return false }
    hint = 2 * low - 1
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
