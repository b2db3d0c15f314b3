import Testing

@testable import TraceryRecord

/// The symbol file the agent writes once per object and trace, read back as the readers do.
@Suite struct SymbolFileTests {
  @Test func namesAndSitesReadBackAsWritten() throws {
    let sites: [(site: UInt64, name: String)] = [
      (0, "zero"), (0x1f, "plain"), (0x4010a0, "with space"), (0x4010b0, "100%\ttab\nline"),
      (0xffff_ffff_ffff_fff0, "$s4main3fooyyF"), (UInt64.max, "\u{7f}é"),
    ]
    let file = SymbolFile(
      path: "/a dir/prog", buildID: "abcd", identity: FileIdentity(device: 1, inode: 2, size: 3, modified: 4),
      sites: sites)
    let text = file.text
    #expect(
      text.hasPrefix("tracery-symbols 1\npath /a%20dir/prog\nbuild-id abcd\nidentity 1 2 3 4\n0 zero\n1f plain\n"))
    #expect(text.contains("\n4010b0 100%25%09tab%0Aline\n"))
    let read = try SymbolFile(text: text)
    #expect(read.path == "/a dir/prog" && read.buildID == "abcd" && read.identity == file.identity)
    #expect(read.sites.map(\.site) == sites.map(\.site))
    #expect(read.sites.map(\.name) == sites.map(\.name))
    #expect(TextField.escape("nothing_to_escape") == "nothing_to_escape")
  }
}
