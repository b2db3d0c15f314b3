import CTracery
import CTraceryShims
import TraceryCore
import TraceryRecord

#if canImport(Glibc)
  import Glibc
#endif

/// `-A` / `-R` in the agent: a second graph user, with handlers, on the functions the specs name.
/// Users run in slot order, and the recorder took slot 0 first, so at an entry the recorder's
/// event is written before this user's data event, and at an exit likewise: a data event always
/// follows the event its values belong to (a signal handler's traced call in between could break
/// that pairing; the reader then shows the values on the wrong call, never crashes).
///
/// Protocol: `items` is filled before the user is attached and only read afterwards (by the
/// handlers, on any thread).
enum ValueRecorder {
  nonisolated(unsafe) static var items: [UInt64: [ValueSpec.Item]] = [:]
  nonisolated(unsafe) static var link: GraphLink?

  /// The specs from `TRACERY_ARGUMENTS` (lines `A SPEC` / `R SPEC`); unparsable lines are
  /// skipped (the CLI checked them).
  static func specs(_ text: String) -> [ValueSpec] {
    text.split(separator: "\n").compactMap { line in
      guard line.count > 2 else { return nil }
      return try? ValueSpec(parsing: String(line.dropFirst(2)), returnValue: line.hasPrefix("R "))
    }
  }

  /// Attaches to every chosen function (site by name) some spec's pattern matches.
  static func attach(
    _ specs: [ValueSpec], kind: NameMatcher.Kind, functions: [(name: String, site: UInt64)], depth: Int?
  ) {
    for spec in specs {
      guard let matcher = try? NameMatcher(spec.pattern, kind: kind) else { continue }
      for function in functions where matcher.matches(function.name) {
        items[function.site, default: []] += spec.items
      }
    }
    guard !items.isEmpty else { return }
    link = try? Tracer.shared.attachGraph(
      .handlers(entry: entry, exit: exit), to: .addresses(Array(items.keys)), depthLimit: depth)
  }

  static let entry: GraphEntryHandler = { frame, _, call, _ in
    guard let wanted = ValueRecorder.items[frame.pointee.site] else { return 0 }
    ValueRecorder.record(wanted, returnValue: false, call: call)
    return wanted.contains { $0.source == 0 } ? 1 : 0
  }

  static let exit: GraphExitHandler = { frame, _, call, _ in
    guard let wanted = ValueRecorder.items[frame.pointee.site] else { return }
    ValueRecorder.record(wanted, returnValue: true, call: call)
  }

  /// Writes one data event with the values of `wanted` that are arguments (or the return value).
  static func record(_ wanted: [ValueSpec.Item], returnValue: Bool, call: UnsafeMutablePointer<tracery_call>) {
    let raw = UnsafeRawPointer(call)
    let chosen = wanted.filter { ($0.source == 0) == returnValue }
    guard !chosen.isEmpty else { return }
    let stride = DataEvent.maximumString + 8
    withUnsafeTemporaryAllocation(byteCount: stride * chosen.count, alignment: 8) { strings in
      var lengths: [Int] = []
      var readable: [Bool] = []
      var truncated: [Bool] = []
      var integers: [UInt64] = []
      for (index, item) in chosen.enumerated() {
        let integer =
          item.source == 0
          ? raw.load(fromByteOffset: 88, as: UInt64.self)
          : raw.load(fromByteOffset: 32 + 8 * (item.source - 1), as: UInt64.self)
        integers.append(integer)
        guard item.format == .string else {
          lengths.append(0)
          readable.append(true)
          truncated.append(false)
          continue
        }
        let buffer = strings.baseAddress! + index * stride
        let count = readString(at: integer, into: buffer, capacity: DataEvent.maximumString + 1)
        let length = count.map { read in
          (0..<read).first { buffer.load(fromByteOffset: $0, as: UInt8.self) == 0 }
            ?? min(read, DataEvent.maximumString)
        }
        lengths.append(length ?? 0)
        readable.append(length != nil)
        truncated.append(
          count.map { read in length == min(read, DataEvent.maximumString) && read > DataEvent.maximumString } ?? false)
      }
      let size = DataEvent.size(stringLengths: lengths)
      guard let cursor = room(for: size) else { return }
      var offset = 8
      for (index, item) in chosen.enumerated() {
        let string =
          item.format == .string && readable[index]
          ? UnsafeRawBufferPointer(start: strings.baseAddress! + index * stride, count: lengths[index]) : nil
        offset += DataEvent.write(
          item, integer: integers[index], string: string, truncated: truncated[index], to: cursor + offset)
      }
      cursor.storeBytes(of: DataEvent.header(payload: size - 8).littleEndian, as: UInt64.self)
      ctracery_thread_state()!.pointee.event_cursor += UInt64(size)
    }
  }

  /// Where `size` bytes fit in this thread's buffer, moving to the next chunk if needed; nil
  /// when there is no room (counted as dropped).
  static func room(for size: Int) -> UnsafeMutableRawPointer? {
    let state = ctracery_thread_state()!
    // The recorder's `end` is 8 bytes short of the chunk's end (see Agent.refill).
    func fits() -> Bool {
      state.pointee.event_cursor != 0 && state.pointee.event_cursor + UInt64(size) <= state.pointee.event_end + 8
    }
    if !fits() { Agent.refill() }
    guard fits() else {
      state.pointee.dropped += 1
      return nil
    }
    return UnsafeMutableRawPointer(bitPattern: UInt(state.pointee.event_cursor))
  }

  /// Copies up to `capacity` bytes from `address` in this process without faulting on a bad
  /// pointer (`process_vm_readv` returns what it could read). nil: nothing readable.
  static func readString(at address: UInt64, into buffer: UnsafeMutableRawPointer, capacity: Int) -> Int? {
    guard address != 0 else { return nil }
    let read = ctracery_read_memory(buffer, UnsafeRawPointer(bitPattern: UInt(address)), UInt(capacity))
    return read > 0 ? read : nil
  }
}
