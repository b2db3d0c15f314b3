import CTraceryShims
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
    /// Mapped from a file or named by the kernel (`[vdso]`): an object's code. Anonymous
    /// executable memory (a JIT's code) is not, nor a memfd's (a JIT's double-mapped code, as
    /// .NET's; the arena's slabs are known to it) or a name given to anonymous memory
    /// (`[anon:...]`). Read only for executable regions (others: false).
    var named = false

    var protection: Int32 {
      (readable ? 1 : 0) | (writable ? 2 : 0) | (executable ? 4 : 0)
    }
  }

  let regions: [Region]
  /// Readable and executable address ranges, adjacent regions merged: start and end words,
  /// alternating. `isExecutable` runs once per site of a batch, so it searches this short list.
  private let executable: [UInt64]

  /// The mappings now; inside `fixed(_:)`, on its thread, the one snapshot it took (with the
  /// arena's slabs mapped since). For the patcher, the resolver, library calls and the
  /// reclaimer's stack scan; the arena places its slabs by `recent` and `fresh`.
  static func current() -> MemoryMap {
    // (The thread asked only while a map is pinned: `gettid` is a system call.)
    let pinned = pin.withLock { pin in pin.flatMap { $0.thread == ctracery_gettid() ? $0.map : nil } }
    return pinned ?? fresh()
  }

  /// The mappings now, read from `/proc` (~60 µs in a small traced process: 43 lines).
  static func fresh() -> MemoryMap {
    let map = MemoryMap(parsing: System.readFile("/proc/thread-self/maps") ?? [])
    latest.withLock { $0 = map }
    return map
  }

  /// The last map any caller read (or a new one): for uses that a stale map cannot harm, such as
  /// choosing where to try a `MAP_FIXED_NOREPLACE` mapping (a miss is retried with a fresh map).
  static func recent() -> MemoryMap {
    latest.withLock { $0 } ?? fresh()
  }

  /// Runs `body` with one reading of the mappings, taken now, for every `current()` this thread
  /// takes in it (a traced process's start read them three times: library calls, resolve, the
  /// reclaimer's scan at the patch batch). Only where nothing else changes the mappings
  /// meanwhile: no other thread runs (the agent's start, before `main`), and this one maps
  /// nothing but the arena's slabs (`mapped` adds them) and changes protections only for the
  /// span of a patch batch.
  static func fixed<T>(_ body: () throws -> T) rethrows -> T {
    let thread = ctracery_gettid()
    let map = fresh()
    pin.withLock { $0 = Pin(thread: thread, map: map) }
    defer { pin.withLock { $0 = nil } }
    return try body()
  }

  /// The arena mapped `regions` (a slab's code and its writable alias): a map `fixed` pinned
  /// learns them, as a fresh reading would show them (whichever thread mapped them).
  static func mapped(_ regions: [Region]) {
    pin.withLock { pin in
      guard let map = pin?.map else { return }
      pin?.map = MemoryMap(regions: (map.regions + regions).sorted { $0.start < $1.start })
    }
  }

  /// Inside `fixed(_:)`, on its thread: `read()`'s answer the first time, kept for the rest of the
  /// span (the program's exe link: a traced process's start read it four times, ~5 µs each).
  /// Elsewhere `read()` each time: outside a start, the program's file may have been deleted or
  /// replaced since (its link then says so).
  static func programLink(_ read: () -> String?) -> String? {
    let thread = ctracery_gettid()
    if let known = pin.withLock({ $0.flatMap { $0.thread == thread ? $0.programLink : nil } }) { return known }
    let link = read()
    pin.withLock { pin in if pin?.thread == thread { pin?.programLink = .some(link) } }
    return link
  }

  private struct Pin {
    let thread: Int32
    var map: MemoryMap
    /// `programLink`'s answer once read (which may be nil: no link to read).
    var programLink: String?? = nil
  }

  private static let latest = Mutex<MemoryMap?>(nil)
  private static let pin = Mutex<Pin?>(nil)

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
          let executable = bytes[perms + 2] == 0x78
          regions.append(
            Region(
              start: start, end: end, readable: bytes[perms] == 0x72, writable: bytes[perms + 1] == 0x77,
              executable: executable, named: executable && Self.hasPath(bytes, from: perms + 4)))
        }
        while at < count && bytes[at] != 0x0a { at += 1 }  // to the end of the line
        at += 1
      }
    }
    // The kernel lists mappings in address order.
    self.init(regions: regions)
  }

  /// A map of `regions`, sorted by address and not overlapping.
  private init(regions: [Region]) {
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

  /// Whether the line whose fields after the permissions start at `at` (offset, device, inode)
  /// goes on to a path that is not an anonymous mapping's name (`[anon:...]`) or a memfd's.
  private static func hasPath(_ bytes: UnsafeBufferPointer<UInt8>, from at: Int) -> Bool {
    var at = at
    for _ in 0..<4 {
      while at < bytes.count && bytes[at] == 0x20 { at += 1 }
      if at >= bytes.count || bytes[at] == 0x0a { return false }
      if bytes[at] == 0x2f || bytes[at] == 0x5b {  // '/' or '[', where the path starts
        func starts(with name: [UInt8]) -> Bool {
          at + name.count <= bytes.count && (0..<name.count).allSatisfy { bytes[at + $0] == name[$0] }
        }
        return !starts(with: anonymousName) && !starts(with: memfdName)
      }
      while at < bytes.count && bytes[at] != 0x20 && bytes[at] != 0x0a { at += 1 }
    }
    return false
  }

  private static let anonymousName: [UInt8] = Array("[anon:".utf8)
  private static let memfdName: [UInt8] = Array("/memfd:".utf8)

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
  func region(containing address: UInt64) -> Region? { index(containing: address).map { regions[$0] } }

  /// The index in `regions` of the region containing `address`.
  private func index(containing address: UInt64) -> Int? {
    var low = 0
    var high = regions.count
    while low < high {
      let mid = (low + high) / 2
      if regions[mid].start <= address { low = mid + 1 } else { high = mid }
    }
    guard low > 0, address < regions[low - 1].end else { return nil }
    return low - 1
  }

  /// The main thread's stack as glibc's `pthread_getattr_np` computes it from `/proc/self/maps`
  /// (nptl's pthread_getattr_np.c): it ends at the page after `stackEnd` (`__libc_stack_end`,
  /// below the arguments and environment) and reaches down by the stack limit less what the
  /// mapping holds above that page, page-aligned, no lower than the end of the mapping below.
  /// nil when no mapping holds `stackEnd`.
  func mainThreadStack(stackEnd: UInt64, limit: UInt64) -> (low: UInt64, high: UInt64)? {
    guard let index = index(containing: stackEnd) else { return nil }
    let high = System.pageStart(stackEnd) + System.pageSize
    let below = index > 0 ? regions[index - 1].end : 0
    // Unsigned, as glibc's: a limit smaller than what lies above wraps, and the mapping below
    // then bounds it.
    var size = System.pageStart(limit &- (regions[index].end &- high))
    if size > high &- below { size = high &- below }
    return (high - size, high)
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
