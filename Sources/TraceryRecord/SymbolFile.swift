#if canImport(Glibc)
  import Glibc
#endif

/// The names of one object's traced functions, saved in the trace directory when it is recorded
/// (`DIR/symbols/KEY.sym`), so that readers name the events by what ran, not by what is on disk
/// later (a rebuild, without a build-id, would otherwise rename every function silently).
///
/// The agent writes one per distinct object with patch sites (the first process that loads it;
/// later ones find it there); the process file's object lines name it by `key`. Text:
///
///     tracery-symbols 1
///     path PATH
///     build-id HEX or -
///     identity DEV INODE SIZE MTIME-NS     the file as it was loaded
///     SITE NAME                             per function: its patch site (link-time, hex) and symbol
public struct SymbolFile: Sendable, Equatable {
  public var path: String
  public var buildID: String?
  public var identity: FileIdentity?
  /// (link-time site address, symbol), sorted by address.
  public var sites: [(site: UInt64, name: String)]

  public init(path: String, buildID: String?, identity: FileIdentity?, sites: [(site: UInt64, name: String)]) {
    self.path = path
    self.buildID = buildID
    self.identity = identity
    self.sites = sites.sorted { $0.site < $1.site }
  }

  public static func == (a: SymbolFile, b: SymbolFile) -> Bool {
    a.path == b.path && a.buildID == b.buildID && a.identity == b.identity
      && a.sites.elementsEqual(b.sites) { $0.site == $1.site && $0.name == $1.name }
  }

  /// The name of an object's file in `DIR/symbols`: by build-id when it has one, else by its
  /// file identity (a rebuilt file is a new key).
  public static func key(buildID: String?, identity: FileIdentity?) -> String? {
    if let buildID { return "build-id-" + buildID }
    guard let identity else { return nil }
    return "file-\(identity.device)-\(identity.inode)-\(identity.size)-\(identity.modified)"
  }

  public var text: String {
    let header =
      "tracery-symbols 1\npath \(TextField.escape(path))\nbuild-id \(buildID ?? "-")\nidentity "
      + (identity.map { "\($0.device) \($0.inode) \($0.size) \($0.modified)" } ?? "-") + "\n"
    // Bytes, not a string per line: every traced process that is first to load an object writes
    // one line per function (~0.2 µs a line as strings joined, ~0.4 ms of a 2,200-function start).
    var bytes = Array(header.utf8)
    bytes.reserveCapacity(bytes.count + sites.count * 32)
    let digits = Array("0123456789abcdef".utf8)
    for (site, name) in sites {
      var shift = max(0, (63 - site.leadingZeroBitCount) / 4 * 4)
      while shift >= 0 {
        bytes.append(digits[Int((site >> UInt64(shift)) & 15)])
        shift -= 4
      }
      bytes.append(UInt8(ascii: " "))
      TextField.appendEscaped(name, to: &bytes)
      bytes.append(UInt8(ascii: "\n"))
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  public init(text: String) throws(TraceError) {
    let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
    guard lines.count >= 4, lines[0] == "tracery-symbols 1", lines[1].hasPrefix("path "),
      lines[2].hasPrefix("build-id "), lines[3].hasPrefix("identity ")
    else { throw .corrupt("not a Tracery symbol file") }
    path = TextField.unescape(String(lines[1].dropFirst(5)))
    let build = lines[2].dropFirst(9)
    buildID = build == "-" ? nil : String(build)
    let numbers = lines[3].dropFirst(9).split(separator: " ").compactMap { UInt64($0) }
    identity =
      numbers.count == 4
      ? FileIdentity(device: numbers[0], inode: numbers[1], size: numbers[2], modified: numbers[3]) : nil
    var sites: [(site: UInt64, name: String)] = []
    sites.reserveCapacity(lines.count - 4)
    for line in lines.dropFirst(4) {
      guard let space = line.firstIndex(of: " "), let site = UInt64(line[..<space], radix: 16) else {
        throw .corrupt("malformed symbol line '\(line.prefix(80))'")
      }
      sites.append((site, TextField.unescape(String(line[line.index(after: space)...]))))
    }
    self.sites = sites.sorted { $0.site < $1.site }
  }

  /// The symbol whose patch site is `site` (link-time).
  public func name(atSite site: UInt64) -> String? {
    var low = 0
    var high = sites.count
    while low < high {
      let mid = (low + high) / 2
      if sites[mid].site < site { low = mid + 1 } else { high = mid }
    }
    return low < sites.count && sites[low].site == site ? sites[low].name : nil
  }
}

/// What tells one version of a file from another without reading it: device, inode, size and
/// modification time (nanoseconds).
public struct FileIdentity: Sendable, Equatable {
  public let device: UInt64
  public let inode: UInt64
  public let size: UInt64
  public let modified: UInt64

  public init(device: UInt64, inode: UInt64, size: UInt64, modified: UInt64) {
    self.device = device
    self.inode = inode
    self.size = size
    self.modified = modified
  }

  /// The file at `path` now; nil when it cannot be read.
  public init?(path: String) {
    var status = stat()
    guard stat(path, &status) == 0 else { return nil }
    self.init(
      device: UInt64(status.st_dev), inode: UInt64(status.st_ino), size: UInt64(status.st_size),
      modified: UInt64(status.st_mtim.tv_sec) &* 1_000_000_000 &+ UInt64(status.st_mtim.tv_nsec))
  }

  /// Same contents as far as can be told without reading (the inode may differ after a copy).
  public func sameVersion(as other: FileIdentity) -> Bool { size == other.size && modified == other.modified }
}
