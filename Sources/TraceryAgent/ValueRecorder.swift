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

  /// Takes the user off every function (`record -p`'s detach). `items` stays as it was until the
  /// next attach replaces it: a handler that began before may still read it.
  static func detach() {
    link?.detach()
    link = nil
  }

  /// The specs the CLI passed (`AgentEnvironment`); unparsable ones are skipped (the CLI checked
  /// them).
  static func specs(_ environment: AgentEnvironment) -> [ValueSpec] {
    environment.argumentSpecs.compactMap { try? ValueSpec(parsing: $0, returnValue: false) }
      + environment.returnSpecs.compactMap { try? ValueSpec(parsing: $0, returnValue: true) }
  }

  /// Attaches to every chosen function (site by name) some spec's pattern matches, by its raw
  /// or its demangled name (as readers show it).
  static func attach(
    _ specs: [ValueSpec], kind: NameMatcher.Kind, functions: [(name: String, site: UInt64)], depth: Int?
  ) {
    items = [:]
    for spec in specs {
      guard let matcher = try? NameMatcher(spec.pattern, kind: kind) else { continue }
      for function in functions where matcher.matchesFunction(function.name) {
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

  /// Writes one data event with the values of `wanted` that are arguments (or the return value),
  /// at most `maximumValues` of them. Allocates nothing: per-value state and string bytes live
  /// in one stack buffer.
  static func record(_ wanted: [ValueSpec.Item], returnValue: Bool, call: UnsafeMutablePointer<tracery_call>) {
    let raw = UnsafeRawPointer(call)
    // Per value: the register, the string length kept (-1: unreadable), truncated (0/1), then
    // the string bytes.
    let stride = 24 + DataEvent.maximumString + 8
    withUnsafeTemporaryAllocation(byteCount: stride * maximumValues, alignment: 8) { buffer in
      let base = buffer.baseAddress!
      var count = 0
      var size = 8
      for item in wanted where (item.source == 0) == returnValue && count < maximumValues {
        let slot = base + count * stride
        let integer = raw.load(fromByteOffset: item.callOffset, as: UInt64.self)
        var length = 0
        var truncated = 0
        if item.format == .string {
          let bytes = slot + 24
          if let read = readString(at: integer, into: bytes, capacity: DataEvent.maximumString + 1) {
            let end = (0..<read).first { bytes.load(fromByteOffset: $0, as: UInt8.self) == 0 }
            length = end ?? min(read, DataEvent.maximumString)
            truncated = end == nil && read > DataEvent.maximumString ? 1 : 0
          } else {
            length = -1
          }
        }
        slot.storeBytes(of: integer, as: UInt64.self)
        slot.storeBytes(of: length, toByteOffset: 8, as: Int.self)
        slot.storeBytes(of: truncated, toByteOffset: 16, as: Int.self)
        size += 16 + (max(length, 0) + 7) / 8 * 8
        count += 1
      }
      guard count > 0, let cursor = room(for: size) else { return }
      var offset = 8
      var index = 0
      for item in wanted where (item.source == 0) == returnValue && index < count {
        let slot = base + index * stride
        let length = slot.load(fromByteOffset: 8, as: Int.self)
        let string =
          item.format == .string && length >= 0 ? UnsafeRawBufferPointer(start: slot + 24, count: length) : nil
        offset += DataEvent.write(
          item, integer: slot.load(as: UInt64.self), string: string,
          truncated: slot.load(fromByteOffset: 16, as: Int.self) != 0, to: cursor + offset)
        index += 1
      }
      cursor.storeBytes(of: DataEvent.header(payload: size - 8).littleEndian, as: UInt64.self)
      ctracery_thread_state()!.pointee.event_cursor += UInt64(size)
    }
  }

  /// Values per data event: six arguments and the return value, and one spare.
  static let maximumValues = 8

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
