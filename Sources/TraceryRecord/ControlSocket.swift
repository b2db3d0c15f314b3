#if canImport(Glibc)
  import Glibc
#endif

/// The Unix socket between `tracery record -p` and the agent it loaded into a running process:
/// one home for both sides (the CLI listens, the agent connects), as `AgentEnvironment` is for
/// the settings. Lines, each ending in a newline:
///
///     agent → CLI   attached N [U R]  N functions traced (one patch batch); U could not be,
///                                     R the first one's name and reason; or
///                   error MESSAGE     nothing was attached
///     CLI → agent   stop              (or the connection closes: the CLI was killed)
///     agent → CLI   detached          every site back as it was, the recording ended
public enum ControlSocket {
  public static func path(in directory: String) -> String { directory + "/control" }

  public static let attached = "attached"
  public static let error = "error"
  public static let stop = "stop"
  public static let detached = "detached"

  /// A line: the word and its argument, with the newline.
  public static func line(_ word: String, _ argument: String? = nil) -> String {
    argument.map { "\(word) \($0)\n" } ?? "\(word)\n"
  }

  /// The argument of `line` when it begins with `word` (and a space), else nil.
  public static func argument(of line: String, after word: String) -> Substring? {
    line.hasPrefix(word + " ") ? line.dropFirst(word.count + 1) : nil
  }

  /// Sends `text`; MSG_NOSIGNAL: a side that is gone must not end the other with SIGPIPE (the
  /// agent's side is the traced program).
  public static func send(_ fd: Int32, _ text: String) {
    _ = text.withCString { Glibc.send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
  }

  /// A new Unix stream socket (close-on-exec), or -1.
  public static func socket() -> Int32 {
    Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
  }

  /// Calls `body` with `path` as a `sockaddr_un`; nil when the path does not fit in one.
  public static func withAddress<Result>(
    _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Result
  ) -> Result? {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &address.sun_path) { slot in
      slot.copyBytes(from: bytes)
      slot[bytes.count] = 0
    }
    return withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
  }
}
