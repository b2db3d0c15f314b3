#if canImport(Glibc)
  import Glibc
#endif

/// What the fuzz targets (Fuzz/Events.swift, Fuzz/Texts.swift, run by scripts/fuzz.sh) do with
/// one input, here so that the regression tests feed the inputs that once crashed
/// (Fuzz/Regressions) through exactly the same path. Every parser must return or throw; a trap
/// or a hang is the bug the fuzzer looks for.
enum FuzzHarness {
  /// A thread's event file: the input's first byte says how the rest becomes one, after a
  /// header of chunk size 256 (chunk boundaries exercised). 0x00-0x3f: format 3 (sealed
  /// chunks); 0x40-0x7f: format 2 (no seals); 0x80-0xbf: format 3, and the process file's
  /// `thread-end` for it is 4096 + the next two bytes; 0xc0-0xff: one header field (chunk size,
  /// version or dropped, by the byte mod 3) is set from the next eight bytes. Read whole through
  /// the readers' path (`EventCursor`).
  static func eventFile(_ input: [UInt8], directory: String = "/dev/shm") -> (events: Int, damage: [Damage]) {
    guard let mode = input.first else { return (0, []) }
    var header = [UInt8](repeating: 0, count: TraceFormat.headerSize)
    header.replaceSubrange(0..<8, with: TraceFormat.magic)
    func store(_ value: UInt64, at offset: Int, count: Int) {
      for index in 0..<count { header[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    store(UInt64(TraceFormat.version), at: TraceFormat.Header.version, count: 4)
    store(256, at: TraceFormat.Header.chunkSize, count: 8)
    var body = Array(input.dropFirst())
    var writtenEnd: Int?
    switch mode >> 6 {
    case 0: break
    case 1: store(2, at: TraceFormat.Header.version, count: 4)
    case 2:
      guard body.count >= 2 else { return (0, []) }
      writtenEnd = TraceFormat.headerSize + (Int(body[0]) | Int(body[1]) << 8)
      body.removeFirst(2)
    default:
      guard body.count >= 8 else { return (0, []) }
      let fields = [TraceFormat.Header.chunkSize, TraceFormat.Header.version, TraceFormat.Header.dropped]
      let field = fields[Int(mode) % 3]
      let value = (0..<8).reduce(UInt64(0)) { $0 | UInt64(body[$1]) << (8 * UInt64($1)) }
      store(value, at: field, count: field == TraceFormat.Header.version ? 4 : 8)
      body.removeFirst(8)
    }
    let path = "\(directory)/tracery-fuzz-\(getpid())-7.0-7.events"
    guard Files.write(header + body, to: path) else { return (0, []) }
    defer { unlink(path) }
    let (thread, damage) = Trace.readThread(path: path, name: "7.0-7.events", writtenEnd: writtenEnd)
    // Depths go past the field's 2^14 (deep recursions), but each event moves at most one span
    // beyond the one before.
    for (index, event) in (thread?.events ?? []).enumerated() {
      precondition(event.depth >= 0 && event.depth < (index + 1) << 14)
      for value in event.values { _ = value.text }
    }
    for item in damage { precondition(item.bytes >= 0 && item.offset >= 0) }
    _ = Trace.summary(of: damage)
    return (thread?.events.count ?? 0, damage)
  }

  /// Text a user or a file gives: the first byte picks the parser (mod 7): 0 a process file, 1
  /// a symbol file, 2 an -A/-R spec, 3 a regex and 4 a glob (then a name to match after a
  /// newline), 5 the demangler's wrappers, 6 percent-unescaping. Each parsed value is written
  /// back and parsed again.
  static func text(_ input: [UInt8]) {
    guard let kind = input.first else { return }
    let text = String(decoding: input.dropFirst(), as: UTF8.self)
    switch kind % 7 {
    case 0:
      if let process = try? TracedProcess(text: text) { _ = try? TracedProcess(text: process.text) }
    case 1:
      if let symbols = try? SymbolFile(text: text) {
        _ = symbols.name(atSite: 0x1000)
        _ = try? SymbolFile(text: symbols.text)
      }
    case 2:
      _ = try? ValueSpec(parsing: text, returnValue: false)
      _ = try? ValueSpec(parsing: text, returnValue: true)
    case 3, 4:
      let parts = text.split(separator: "\n", maxSplits: 1)
      let matcherKind: NameMatcher.Kind = kind % 7 == 3 ? .regex : .glob
      if let pattern = parts.first, pattern.count < 200,
        let matcher = try? NameMatcher(String(pattern), kind: matcherKind)
      {
        _ = matcher.matchesFunction(parts.count > 1 ? String(parts[1].prefix(300)) : "main")
      }
    case 5:
      _ = Demangler.simplified(text)
      _ = Demangler.withoutParameters(text)
      _ = Demangler.forms(text)
      _ = Demangler.name(text, style: .simple)
    default:
      _ = TextField.escape(TextField.unescape(text))
    }
  }
}
